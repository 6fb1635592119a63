"""Output formats of a sweep, one module per job, each reading ``results.RunResult`` only:
``terminal`` (rich tables, panels and the one-line verdicts; never prints), ``files`` (writing
the report files in ``--out``), ``resume`` (reading them back for ``--resume`` and ``gradclip
report``), ``_io`` (the directory lock, atomic writes, the CSV encoding), ``live`` (the files of a
monitored run that keeps growing), ``html``, ``junit`` and ``jsonout``.

The modules report; they never decide. Statuses, onset steps and parameters come from the
runner; ``gradcheck_cli.text`` puts them into words, the same words in every format. Importing
this package is cheap (stdlib only); each format imports rich or pandas itself. See
docs/outputs.md.
"""

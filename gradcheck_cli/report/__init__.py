"""Output formats of a sweep: one module per format, each reading ``results.RunResult`` only.

=============  =============================================================================
module         output
=============  =============================================================================
``terminal``   rich renderables (summary table, error panels) and one-line verdicts; never
               prints
``files``      ``summary.csv``, ``steps.csv``, ``histograms.csv`` and the resume manifest in
               the output directory, each written atomically
``junit``      a JUnit XML report, one test case per run
``jsonout``    the summary rows as strict JSON, for ``--json`` on stdout
=============  =============================================================================

The modules report; they never decide. Statuses, onset steps and parameters come from the
runner; ``gradcheck_cli.text`` puts them into words, the same words in every format.
Importing this package is cheap (stdlib only); each format imports rich or pandas itself.
"""

"""The user's own training command run as it is (``gradclip sweep|watch|check -- python SCRIPT
ARGS``): parsing the command, one run per fresh process with the run's clipping installed, and
the sweep of such runs. See docs/your-command.md."""

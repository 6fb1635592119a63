"""``python -m gradcheck_cli`` runs the same app as the ``gradclip`` console script."""

from gradcheck_cli.cli import main

if __name__ == "__main__":
    main()

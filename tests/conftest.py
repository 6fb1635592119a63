"""Test-wide setup: the hypothesis profile for mutation testing (tests/README.md)."""

from __future__ import annotations

import os

from hypothesis import Phase, settings

# `mutmut run` sets MUTANT_UNDER_TEST in its own process before it imports any test module
# and keeps it in every worker that runs the tests against a mutant. There, every mutant must
# meet the same examples (a verdict that does not depend on luck, and reruns that agree), and
# a failure is enough to kill it: no shrinking, no example database. Ordinary runs keep
# hypothesis's default profile.
MUTATION_RUN = "MUTANT_UNDER_TEST" in os.environ

settings.register_profile(
    "mutation",
    derandomize=True,
    database=None,
    phases=(Phase.explicit, Phase.generate),
    deadline=None,
    print_blob=False,
)
if MUTATION_RUN:
    settings.load_profile("mutation")
    # Tensors on the "meta" device (tests/test_engine.py) import torch._dynamo on their first
    # operation, about 5 s. mutmut imports this file once in its fork server: import it there,
    # so that every worker forked for a mutant starts with it.
    import torch._dynamo  # noqa: F401

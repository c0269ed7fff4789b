"""A task family of a researcher's own, written the way a user would (outside roads/), for tests/flows/test_own_task.py
and tests/unit/test_family.py: ``own_family.family:Reverse``, whose reward lives in a module of its own package."""

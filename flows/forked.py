"""Imported by the workers' fork server (``flows/warm.py``, ``FORK_PRELOAD``) and nowhere else: what every worker
would otherwise do before its first stage and that does not depend on the study — import every stage's module, and
the parts of opening MLflow's SQL store that do not depend on the store (importing its table models and configuring
their SQLAlchemy mappers: 0.9 s and 0.3 s a worker spent opening the store, measured by cProfile). Last, it freezes
the garbage collector's view of everything imported so far (``gc.freeze``; this module is the last of the fork
server's imports): a forked worker's collections then skip those ~700,000 objects, which never become garbage (a full
collection of them took 0.35 s), and do not write to their pages (which the workers share with the fork server until
written)."""

import gc
import importlib

from roads.stage_table import STAGES

for _stage in STAGES:
    importlib.import_module(f"roads.stages.{_stage}")

try:
    import mlflow.store.model_registry.sqlalchemy_store  # noqa: F401
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
    from sqlalchemy.orm import configure_mappers
except ImportError:  # a tracking server over HTTP only: nothing to prepare
    pass
else:
    configure_mappers()

gc.freeze()

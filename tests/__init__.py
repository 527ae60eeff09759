"""The test suite: ``unit/`` needs no service, ``integration/`` runs on real PostgreSQL + RabbitMQ."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the repository: commands run from here

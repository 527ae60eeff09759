"""The fault-injection suite (SPEC T-REL-1, E-14, E-15, E-16): ``python scripts/fault_suite.py``.

It builds a world through the operator paths (``configfile.apply_text`` + ``leads_import``), lets
the real scheduler process plan and dispatch it, runs real ``dramatiq`` workers against the sandbox
(with provider faults on), and injects infrastructure faults (kill -9 of workers, a RabbitMQ
restart, ``pg_terminate_backend`` of worker connections) at seeded moments. Afterwards it checks
that nothing was lost, sent twice or left unfinished, and prints a table.

Modules: ``services`` (throw-away database + vhost, processes), ``world`` (config + leads),
``faults`` (the seeded plan and the injector), ``checks`` (the verdict), ``run`` (main).
"""

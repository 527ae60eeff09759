"""The engine's library: settings, database, errors, logs, pacing, the step table, planning,
run transitions, recovery, inbox state and text. Imports flow one way (tests/unit/test_architecture.py).
"""

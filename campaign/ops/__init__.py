"""What operators call: the CLI, status and alerts, config apply, leads import, reports, dead
letters and repairs."""

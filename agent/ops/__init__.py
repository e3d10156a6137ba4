"""Operating the agent on a board: self-test, systemd notification and watchdog, service install, signed control commands."""

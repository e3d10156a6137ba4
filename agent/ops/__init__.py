"""Operating the agent on a board: systemd notification and watchdog, service install, self-test."""

"""Operations: what running the agent as a board's system service needs (self-test, systemd, signed commands)."""

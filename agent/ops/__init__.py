"""Operations: what keeps a board running unattended and lets an operator command it (signed commands, key files)."""

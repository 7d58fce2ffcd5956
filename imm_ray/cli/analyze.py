"""imm-ray analyze (to be written)."""

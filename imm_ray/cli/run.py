"""imm-ray run (to be written)."""

"""imm-ray merge (to be written)."""

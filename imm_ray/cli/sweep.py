"""imm-ray sweep (to be written)."""

"""imm-ray grade (to be written)."""

"""imm-ray evaluate (to be written)."""

"""imm-ray toy (to be written)."""

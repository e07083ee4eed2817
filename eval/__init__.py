"""Quality evaluation: commands that print accuracy tables (nothing here is asserted)."""

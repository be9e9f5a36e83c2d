"""fedrecon_fast."""

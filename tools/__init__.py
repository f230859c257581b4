"""Developer scripts that build backdoored example models (not part of the installed package)."""

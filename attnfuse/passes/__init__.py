"""Graph passes: canonicalize -> match -> masks -> rewrite (one entry point each)."""

"""The out-of-distribution guard: fitted at publish, numpy distances at serve time."""

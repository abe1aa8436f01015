"""Pure functions over cubes (no I/O, no torch): metrics, the accessor, the null, statistics, dynamics, gamma."""

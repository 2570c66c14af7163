//! Pure domain aggregates (filled in by the write-path work).

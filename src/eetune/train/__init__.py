"""The train wing: data sources, packing and self-generated data (`data`, `selfdata`), chunked
exit losses (`losses`), the tune recipe with its checkpoints and hidden-state cache (`tune`),
and gate fitting (`gates`). The backbone stays frozen throughout; only exit heads and gates
learn."""

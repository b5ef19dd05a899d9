"""One module per op family, each the op's one home: its specification (schema, checks, output
rule, saved statistics), its pure-torch reference and its backward formulas. spec.py holds the
language they are written in; cdam_fast/opspec.py lists the homes and builds the registry.
See docs/extending.md for adding an op."""

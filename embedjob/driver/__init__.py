"""What runs the stages: preflight (every check before a model loads, one spec per stage),
the pipeline (the Ray Data plan), the run (stream, commit, summarize), commits, the progress
record and the output's lease."""

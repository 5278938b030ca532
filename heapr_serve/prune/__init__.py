"""Stage 3, prune: methods (scores + allocations), width allocation, and the compress/apply commands."""

"""`python -m heapr_serve ...` is `heapr-serve ...` (what torchrun launches: `torchrun -m heapr_serve compress`)."""

from heapr_serve.cli import main

main()

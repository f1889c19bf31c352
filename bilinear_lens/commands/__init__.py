"""One module per ``bilinear-lens`` subcommand (``build_parser()`` + ``main(argv)``)."""

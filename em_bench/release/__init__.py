"""The shipped organism as a release (maintainers' tools, above the organism and its SAEs):
ship makes it (`em-bench organism ship`), verify rebuilds it from its recipe and compares the
rebuild's figures with the shipped one's (`em-bench organism build --verify`)."""

"""``moekit bench``: placeholder until the benchmark lands."""


def add_arguments(parser) -> None:
    pass


def run(args) -> int:
    raise SystemExit("moekit bench: not implemented yet")

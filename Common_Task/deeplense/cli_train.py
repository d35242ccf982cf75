"""CLI subcommands for training, evaluation, prediction and reports (filled in by the engine)."""


def add_commands(sub, add_common) -> None:
    return None

"""The one exception type users catch for a bad `cpu_offloading` setup."""


class ConfigError(ValueError):
    """Every problem found in a config at once; `.errors` is a list of (json_path, message)."""

    def __init__(self, errors, source=None):
        self.errors = list(errors)
        self.source = source
        where = f" in {source}" if source else ""
        lines = [f"{len(self.errors)} problem(s) with the cpu_offloading config{where}:"]
        lines += [f"  - {path}: {msg}" for path, msg in self.errors]
        super().__init__("\n".join(lines))

"""Bearer-token file lines, as the edge server's token table and a device's token file both write them."""

from __future__ import annotations


def parse_token_line(line: str) -> tuple[str, str] | None:
    """A line `token` or `client_id:token` as (client_id, token), client_id "" when absent; None for a blank line
    or a `#` comment. The first `:` separates the two, so one line can be copied from a server's file to a device."""
    line = line.strip()
    if not line or line.startswith("#"):
        return None
    client_id, sep, token = line.partition(":")
    if not sep:
        return "", line
    return client_id.strip(), token.strip()

"""One HTTP request, answered as JSON on stdout: {"status": N, "body": <decoded JSON, or the text>}. Run by tests in
another network namespace than theirs (tests/netns.py), where only a process started there can reach the address.

    python tests/http_call.py METHOD URL [JSON_BODY] [--header 'Name: value']...
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request


def main(argv: list[str]) -> None:
    headers = {"Content-Type": "application/json"}
    positional = []
    args = iter(argv)
    for arg in args:
        if arg == "--header":
            name, value = next(args).split(":", 1)
            headers[name.strip()] = value.strip()
        else:
            positional.append(arg)
    method, url, *rest = positional
    data = rest[0].encode() if rest else None
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, text = response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        status, text = exc.code, exc.read().decode(errors="replace")
    try:
        body = json.loads(text)
    except ValueError:
        body = text[:2000]
    print(json.dumps({"status": status, "body": body}))


if __name__ == "__main__":
    main(sys.argv[1:])

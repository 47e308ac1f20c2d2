"""An HTTP client for the CLI commands that talk to a running lorajobs."""

import os
import sys

import httpx


def add_connection_args(parser) -> None:
    parser.add_argument("--base-url", default=os.environ.get("LORAJOBS_BASE_URL", "http://127.0.0.1:8000/v1"),
                        help="API base URL (LORAJOBS_BASE_URL).")
    parser.add_argument("--api-key", default=os.environ.get("LORAJOBS_API_KEY") or os.environ.get("OPENAI_API_KEY"),
                        help="API key (LORAJOBS_API_KEY).")


def client(args, timeout: float = 60.0) -> httpx.Client:
    if not args.api_key:
        sys.exit("lorajobs: set LORAJOBS_API_KEY or pass --api-key")
    return httpx.Client(base_url=args.base_url.rstrip("/") + "/", timeout=timeout,
                        headers={"Authorization": f"Bearer {args.api_key}"})


def check(response: httpx.Response) -> dict:
    """The JSON body of a successful response; otherwise exit with the API's error message."""
    if response.is_success:
        return response.json()
    try:
        error = response.json()["error"]
        sys.exit(f"lorajobs: {response.status_code} {error.get('code') or error.get('type')}: {error['message']}")
    except (ValueError, KeyError, TypeError):
        sys.exit(f"lorajobs: HTTP {response.status_code}: {response.text[:500]}")

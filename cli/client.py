"""An HTTP client for the CLI commands that talk to a running lorajobs.

The key comes from LORAJOBS_API_KEY or --api-key only: never from OPENAI_API_KEY, which holds a key for
another service. It is not sent in clear over the network: plain HTTP is for loopback unless --insecure
(or LORAJOBS_INSECURE_HTTP=1) says the network is trusted.
"""

import ipaddress
import os
import sys
from urllib.parse import urlsplit

import httpx

TRUTHY = {"1", "true", "yes", "on"}


def add_connection_args(parser) -> None:
    parser.add_argument("--base-url", default=os.environ.get("LORAJOBS_BASE_URL", "http://127.0.0.1:8000/v1"),
                        help="API base URL (LORAJOBS_BASE_URL).")
    parser.add_argument("--api-key", default=os.environ.get("LORAJOBS_API_KEY"), help="API key (LORAJOBS_API_KEY).")
    parser.add_argument("--insecure", action="store_true",
                        default=os.environ.get("LORAJOBS_INSECURE_HTTP", "").lower() in TRUTHY,
                        help="Send the key over plain HTTP to a host other than this machine "
                             "(LORAJOBS_INSECURE_HTTP=1).")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def plain_http_refusal(base_url: str) -> str | None:
    """Why the key must not be sent to `base_url` without --insecure, or None."""
    url = urlsplit(base_url)
    if url.scheme == "https" or (url.scheme == "http" and is_loopback(url.hostname or "")):
        return None
    if url.scheme != "http":
        return f"--base-url must be an http:// or https:// URL, not {base_url!r}"
    return (f"refusing to send the API key in clear to {url.hostname} over plain HTTP; use https:// or, on a "
            "trusted network, pass --insecure (LORAJOBS_INSECURE_HTTP=1)")


def client(args, timeout: float = 60.0) -> httpx.Client:
    if not args.api_key:
        sys.exit("lorajobs: set LORAJOBS_API_KEY or pass --api-key")
    refusal = plain_http_refusal(args.base_url)
    if refusal and not (args.insecure and args.base_url.startswith("http://")):
        sys.exit(f"lorajobs: {refusal}")
    # httpx drops the Authorization header when a redirect leaves for another host (a presigned S3 URL).
    return httpx.Client(base_url=args.base_url.rstrip("/") + "/", timeout=timeout,
                        headers={"Authorization": f"Bearer {args.api_key}"})


def check(response: httpx.Response) -> dict:
    """The JSON body of a successful response; otherwise the API's error message, as an ApiError (cli/output.py)."""
    from cli.output import ApiError

    if response.is_success:
        try:
            return response.json()
        except ValueError:
            raise ApiError(response.status_code, not_the_api(
                response, f"answered with {response.headers.get('content-type') or 'a body'} instead of JSON")) from None
    if response.is_redirect:
        raise ApiError(response.status_code, not_the_api(
            response, f"redirected to {response.headers.get('location', '?')}"))
    try:
        error = response.json()["error"]
        message = f"{response.status_code} {error.get('code') or error.get('type')}: {error['message']}"
    except (ValueError, KeyError, TypeError):
        message = f"HTTP {response.status_code}: {response.text[:500]}"
    if response.status_code == 404 and "/v1/" not in response.request.url.path:
        message += f" ({response.request.url.path} is outside the API's /v1; {BASE_URL_HINT})"
    raise ApiError(response.status_code, message)


BASE_URL_HINT = "is the base URL (--base-url, LORAJOBS_BASE_URL) the API's, ending in /v1, e.g. http://127.0.0.1:8000/v1?"


def not_the_api(response: httpx.Response, what: str) -> str:
    """A URL that is not one of the API's: most often a base URL without its /v1 (the dashboard redirects)."""
    return (f"HTTP {response.status_code}: {response.request.url.path} {what}, which the lorajobs API never does; "
            + BASE_URL_HINT)

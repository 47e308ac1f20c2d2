"""Presigned download URLs live LORAJOBS_PRESIGN_EXPIRY_SECONDS (10 minutes by default), not an hour."""

from urllib.parse import parse_qs, urlsplit

from core.settings import Settings
from core.storage import get_storage


def expires_of(url: str) -> int:
    return int(parse_qs(urlsplit(url).query)["X-Amz-Expires"][0])


def test_presigned_urls_expire_after_the_configured_time(settings):
    assert Settings().presign_expiry_seconds == 600
    assert expires_of(get_storage(settings).presigned_get_url("projects/p/a.tar.gz")) == settings.presign_expiry_seconds
    short = get_storage(settings.model_copy(update={"presign_expiry_seconds": 60}))
    assert expires_of(short.presigned_get_url("projects/p/a.tar.gz")) == 60

"""Settings of the demo Django project the integration tests serve."""

import json
import os

SECRET_KEY = "produl-demo-only-not-a-secret"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
ROOT_URLCONF = "produl_django_demo.urls"
USE_TZ = True
DATABASES: dict[str, dict[str, str]] = {}
INSTALLED_APPS = ["django.contrib.contenttypes", "django.contrib.auth"]

MIDDLEWARE = [
    # Stands in for AuthenticationMiddleware: sets request.user from a
    # header, so the demo needs no database.
    "produl_django_demo.auth.HeaderUserMiddleware",
    "produl_server.integrations.django.ProdulMiddleware",
]

# server_key and api_url come from PRODUL_SERVER_KEY / PRODUL_API_URL.
PRODUL = {
    "pageviews": True,
    "exclude_paths": [r"/healthz$", r"/static/"],
}
# The tests tune the client through this variable (e.g. flush_at).
PRODUL.update(json.loads(os.environ.get("DEMO_PRODUL_OPTIONS", "{}")))

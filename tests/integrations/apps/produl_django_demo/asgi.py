"""ASGI entry point of the demo project (``uvicorn produl_django_demo.asgi:application``)."""

import os

from django.core.asgi import get_asgi_application

from produl_server.integrations.asgi import ProdulLifespan
from produl_server.integrations.django import get_client

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "produl_django_demo.settings")
django_application = get_asgi_application()
# Django's handler does not speak the lifespan protocol: this answers it, and
# delivers what is still queued when the server stops.
application = ProdulLifespan(django_application, get_client())

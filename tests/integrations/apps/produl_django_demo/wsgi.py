"""WSGI entry point of the demo project (``gunicorn produl_django_demo.wsgi``)."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "produl_django_demo.settings")
application = get_wsgi_application()

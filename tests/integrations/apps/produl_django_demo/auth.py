"""A database-free stand-in for Django's AuthenticationMiddleware."""

from django.contrib.auth.models import AnonymousUser, User


class HeaderUserMiddleware:
    """Sets ``request.user`` to an (unsaved) ``User`` whose pk is the ``X-Demo-User`` header."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        user_id = request.headers.get("X-Demo-User")
        request.user = User(pk=int(user_id)) if user_id else AnonymousUser()
        return self.get_response(request)

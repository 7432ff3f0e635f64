"""A database-free stand-in for Django's AuthenticationMiddleware."""

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.contrib.auth.models import AnonymousUser, User


def site_session(request):
    """The session key the site's pages pass in their own ``X-Site-Session`` header."""
    return request.headers.get("X-Site-Session")


class HeaderUserMiddleware:
    """Sets ``request.user`` to an (unsaved) ``User`` whose pk is the ``X-Demo-User`` header.

    Sync and async capable, like Produl's, so that under ASGI async views
    run in the event loop with no hop to a thread.
    """

    sync_capable = True
    async_capable = True

    def __init__(self, get_response):
        self.get_response = get_response
        self.async_mode = iscoroutinefunction(get_response)
        if self.async_mode:
            markcoroutinefunction(self)

    def __call__(self, request):
        user_id = request.headers.get("X-Demo-User")
        request.user = User(pk=int(user_id)) if user_id else AnonymousUser()
        # In async mode this returns the view's coroutine, which Django awaits.
        return self.get_response(request)

"""The built-in app (`conveyor.tasks:app`): the two task types served when no --app is given.
[task types A, B]"""

from __future__ import annotations

from conveyor.application import Conveyor
from conveyor.registry import RetryPolicy
from conveyor.tasks.thumbnail import ThumbnailPayload, make_thumbnail
from conveyor.tasks.webhook import WebhookPayload, send_webhook

app = Conveyor()
app.task("webhook", payload=WebhookPayload, max_attempts=8, timeout=130,
         retry=RetryPolicy(base_delay_s=2.0, max_delay_s=600.0))(send_webhook)
app.task("thumbnail", payload=ThumbnailPayload, max_attempts=3, timeout=60,
         process=True)(make_thumbnail)

"""Forges (GitHub, Gitea/Forgejo, GitLab): webhooks in (``webhook``), commit statuses out
(``status``). Pure building blocks over ``narwhal.config.forges.Forge``; the dispatcher and
the API wire them in."""

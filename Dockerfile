# The app as one container image: Factor VII made literal. The image carries its own web
# server and binds $PORT; every process type runs from it (`docker run IMAGE python
# worker.py`), and an engine scales each type by running more containers (Factor VIII):
# Kubernetes replicas (k8s/) or `docker compose up --scale web=4` (compose.yaml).
FROM python:3.12-slim

WORKDIR /app
# The app's three process types and the backing services they meet in, the Procfile that
# names them, and some platform: entrypoint.sh names each container, and router.py (with
# the modules it imports: health, formation, logs) is compose.yaml's router. One image
# rather than a second one for the router: the router is standard-library Python that
# imports nothing of the app (tests/test_imports.py), so a second image would hold the
# same Python twice and be built twice, to save four small files.
COPY webapp.py page.py page.html web_server.py web_receiver.py web_input.py worker.py \
     clock.py session_store.py job_queue.py job_scripts.py tasks.py database.py \
     redis_client.py leases.py Procfile entrypoint.sh router.py health.py formation.py logs.py ./

# Inside a container, loopback is unreachable from outside: bind every interface.
# State goes to a volume, never to the container's own disk (Factor VI). A SQLite file
# on a volume serves copies on one host; replicas on many hosts need a networked store:
# compose.yaml and k8s/ set DATABASE_URL to their Redis.
# STOP_TIMEOUT=8: `docker stop` sends SIGTERM, waits 10 s, then SIGKILLs; a copy must be
# done before that. Engines that wait longer say so and raise it (compose.yaml, k8s/).
ENV HOST=0.0.0.0 \
    PORT=5000 \
    DATABASE_URL=sqlite:////data/app.db \
    STOP_TIMEOUT=8 \
    PYTHONUNBUFFERED=1
# nobody (65534) by number, not by name: Kubernetes' runAsNonRoot can only check a number.
RUN mkdir /data && chown 65534:65534 /data
VOLUME /data
USER 65534:65534
EXPOSE 5000

# Exec form throughout, so that no shell stays between `docker stop`'s SIGTERM and Python
# (a shell would swallow it, and the container would be killed after 10 s): the
# entrypoint names the container (DYNO), then `exec`s the command, so python is PID 1.
# In Kubernetes, set `args:` (this CMD), never `command:`, which would replace it.
ENTRYPOINT ["sh", "entrypoint.sh"]
CMD ["python", "webapp.py"]

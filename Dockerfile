# One web copy as a container image: Factor VII made literal. The image carries its own
# web server and binds $PORT; Kubernetes replicas or `docker run` several times scale it
# out (Factor VIII), and the router in front is the platform's (a Service, an ingress).
FROM python:3.12-slim

WORKDIR /app
# The app's three process types and the backing services they meet in; not the platform.
COPY webapp.py page.html web_server.py worker.py clock.py session_store.py job_queue.py tasks.py \
     database.py Procfile ./

# Inside a container, loopback is unreachable from outside: bind every interface.
# State goes to a volume, never to the container's own disk (Factor VI). A SQLite file
# on a volume serves copies on one host; replicas on many hosts need a networked store
# (Postgres, Redis) behind the same SessionStore interface.
ENV HOST=0.0.0.0 \
    PORT=5000 \
    DATABASE_URL=sqlite:////data/app.db \
    PYTHONUNBUFFERED=1
RUN mkdir /data && chown nobody /data
VOLUME /data
USER nobody
EXPOSE 5000

# The exec form makes python PID 1, so `docker stop`'s SIGTERM reaches the app itself
# (a shell in between would swallow it and the container would be killed after 10 s).
CMD ["python", "webapp.py"]

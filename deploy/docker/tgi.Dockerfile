# Hugging Face TGI behind shepherd. Build from the root of a shepherd checkout:
#   docker build -f deploy/docker/tgi.Dockerfile -t my/tgi-shepherd .
# Run: docker run --gpus all -p 3000:3000 -e MODEL_ID=Qwen/Qwen2.5-7B-Instruct my/tgi-shepherd
FROM ghcr.io/huggingface/text-generation-inference:3.3.7

COPY . /opt/shepherd
RUN pip install --no-cache-dir /opt/shepherd

# The tgi backend's default command is `text-generation-launcher --json-output --hostname {host}
# --port {port}`; TGI reads MODEL_ID (and the rest of its settings) from the environment.
ENV BACKEND=tgi \
    MODEL_SERVER_URL=http://127.0.0.1:5001 \
    MODEL_ID=Qwen/Qwen2.5-7B-Instruct \
    WORKER_PORT=3000
EXPOSE 3000
ENTRYPOINT ["shepherd"]
CMD []

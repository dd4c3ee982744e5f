# vLLM behind shepherd: shepherd is the container's first process; it starts vLLM, watches it and
# serves port 3000. Build from the root of a shepherd checkout:
#   docker build -f deploy/docker/vllm.Dockerfile -t my/vllm-shepherd .
# Run: docker run --gpus all -p 3000:3000 -e MODEL_NAME=Qwen/Qwen2.5-7B-Instruct my/vllm-shepherd
FROM vllm/vllm-openai:v0.32.0

COPY . /opt/shepherd
RUN pip install --no-cache-dir /opt/shepherd

ENV BACKEND=vllm \
    MODEL_SERVER_URL=http://127.0.0.1:18000 \
    MODEL_NAME=Qwen/Qwen2.5-7B-Instruct \
    WORKER_PORT=3000
EXPOSE 3000
# The image's own entrypoint is `vllm serve`; shepherd replaces it and starts vLLM itself. MODEL_CMD is
# a shell-style line, so the model can come from MODEL_NAME at run time through `sh -c`.
ENTRYPOINT ["shepherd"]
CMD ["--", "sh", "-c", "exec vllm serve \"$MODEL_NAME\" --host 127.0.0.1 --port 18000"]

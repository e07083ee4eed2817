// The 3D viewer: one three.js scene with two versions of the face, "coloured" (photo texture or vertex colours,
// unlit) and "shaded" (grey, lit geometry), orbit/zoom/pan controls and a reset to the framed view.
import {
  Box3, Color, DirectionalLight, HemisphereLight, Mesh, MeshBasicMaterial, MeshStandardMaterial,
  PerspectiveCamera, Scene, Vector3, WebGLRenderer,
} from "three";
import { OrbitControls } from "three/examples/jsm/controls/OrbitControls.js";
import { GLTFLoader } from "three/examples/jsm/loaders/GLTFLoader.js";

const SHADED = new MeshStandardMaterial({ color: 0xc9c3bd, roughness: 0.65, metalness: 0 });

export class Viewer {
  constructor(container) {
    this.container = container;
    this.renderer = new WebGLRenderer({ antialias: true, preserveDrawingBuffer: true });
    this.renderer.setPixelRatio(Math.min(window.devicePixelRatio || 1, 2));
    container.appendChild(this.renderer.domElement);
    this.renderer.domElement.setAttribute("role", "img");
    this.renderer.domElement.setAttribute("aria-label", "3D view of the reconstructed face");

    this.scene = new Scene();
    this.scene.background = new Color(0xe9ecef);
    this.camera = new PerspectiveCamera(30, 1, 0.01, 1000);
    this.camera.position.set(0, 0, 10);
    this.scene.add(this.camera);
    this.scene.add(new HemisphereLight(0xffffff, 0x665544, 1.2));
    const key = new DirectionalLight(0xffffff, 1.8);
    key.position.set(0.5, 0.6, 1);
    this.camera.add(key); // the light follows the camera, so the face stays lit from the viewer's side

    this.controls = new OrbitControls(this.camera, this.renderer.domElement);
    this.controls.addEventListener("change", () => this.render());
    this.loader = new GLTFLoader();
    this.views = { coloured: null, shaded: null };
    this.mode = "coloured";
    this.home = null;

    new ResizeObserver(() => this.resize()).observe(container);
    this.resize();
  }

  resize() {
    const w = this.container.clientWidth || 1;
    const h = this.container.clientHeight || 1;
    this.renderer.setSize(w, h, false);
    this.camera.aspect = w / h;
    this.camera.updateProjectionMatrix();
    this.render();
  }

  render() {
    this.renderer.render(this.scene, this.camera);
  }

  clear() {
    for (const key of Object.keys(this.views)) {
      if (this.views[key]) this.scene.remove(this.views[key]);
      this.views[key] = null;
    }
    this.home = null;
    this.render();
  }

  /** Parse a GLB (ArrayBuffer) into a three.js object. */
  parse(buffer) {
    return new Promise((resolve, reject) => {
      this.loader.parse(buffer, "", (gltf) => resolve(gltf.scene), (err) => reject(err));
    });
  }

  /** Show `buffer` (GLB) as the shaded geometry; `coloured` too when it carries the colours (no texture GLB). */
  async setGeometry(buffer, { alsoColoured = false } = {}) {
    const object = await this.parse(buffer);
    const coloured = alsoColoured ? object.clone(true) : null;
    object.traverse((node) => {
      if (!node.isMesh) return;
      if (!node.geometry.attributes.normal) node.geometry.computeVertexNormals();
      node.material = SHADED;
    });
    this.put("shaded", object);
    if (coloured) await this.setColoured(null, coloured);
  }

  /** Show a GLB (or an already parsed object) as the coloured view: its texture or vertex colours, unlit. */
  async setColoured(buffer, parsed = null) {
    const object = parsed || (await this.parse(buffer));
    object.traverse((node) => {
      if (!node.isMesh) return;
      // A photo texture carries the photo's own shading: show it unlit. Vertex colours are the fitted albedo:
      // light them, or the face looks flat.
      const { map } = node.material;
      if (!node.geometry.attributes.normal) node.geometry.computeVertexNormals();
      node.material = map
        ? new MeshBasicMaterial({ map })
        : new MeshStandardMaterial({ vertexColors: Boolean(node.geometry.attributes.color), roughness: 0.7 });
    });
    this.put("coloured", object);
  }

  put(kind, object) {
    if (this.views[kind]) this.scene.remove(this.views[kind]);
    this.views[kind] = object;
    this.scene.add(object);
    if (!this.home) this.frame(object);
    this.show();
  }

  /** Point the camera at `object` from the front, far enough to see all of it; this is the reset view. */
  frame(object) {
    const box = new Box3().setFromObject(object);
    const center = box.getCenter(new Vector3());
    const radius = box.getSize(new Vector3()).length() / 2 || 1;
    const distance = radius / Math.sin((this.camera.fov * Math.PI) / 360) * 1.05;
    this.home = { target: center.clone(), position: center.clone().add(new Vector3(0, 0, distance)) };
    this.camera.near = distance / 100;
    this.camera.far = distance * 100;
    this.reset();
  }

  reset() {
    if (!this.home) return;
    this.controls.target.copy(this.home.target);
    this.camera.position.copy(this.home.position);
    this.camera.up.set(0, 1, 0);
    this.camera.updateProjectionMatrix();
    this.controls.update();
    this.render();
  }

  /** Show "coloured" or "shaded" (the other one while the chosen one is not loaded yet). */
  show(mode = this.mode) {
    this.mode = mode;
    const shown = this.views[mode] ? mode : Object.keys(this.views).find((k) => this.views[k]);
    for (const [kind, object] of Object.entries(this.views)) {
      if (object) object.visible = kind === shown;
    }
    this.render();
  }
}
